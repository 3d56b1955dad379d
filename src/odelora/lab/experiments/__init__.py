"""One module per experiment; ``lab/registry.py`` lists them."""
