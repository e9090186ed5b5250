"""Task suites and their backbones, one module each; importing a module registers its backbones."""
