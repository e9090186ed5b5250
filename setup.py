"""Package discovery (everything else is in pyproject.toml).

The core lives in ``mergebench/``; the plugin folders ``methods/`` and ``tasks/`` install
as ``mergebench.methods`` and ``mergebench.tasks``. Every package under the three is
found here, so a new sub-package ships in the wheel without being listed by hand.
"""
from setuptools import find_packages, setup

PLUGIN_FOLDERS = {"mergebench.methods": "methods", "mergebench.tasks": "tasks"}


def discover() -> list[str]:
    packages = find_packages(include=["mergebench", "mergebench.*"])
    for package, folder in PLUGIN_FOLDERS.items():
        packages += [package] + [f"{package}.{sub}" for sub in find_packages(folder)]
    return packages


# the mini suite's pinned splits and their manifest ship with the package
PACKAGE_DATA = {"mergebench.tasks": ["data/mini-v2/*.jsonl.gz", "data/mini-v2/manifest.json"]}

setup(packages=discover(), package_dir=dict(PLUGIN_FOLDERS), package_data=PACKAGE_DATA)
