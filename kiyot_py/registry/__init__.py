"""Image references, registries.conf, the node's registry client and the cells' pull path."""
