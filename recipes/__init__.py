"""cirlab.recipes: the YAML recipes that ship with cirlab (package data; `cirlab recipes` lists them)."""
