"""Generated modules of package memslot.v1 (do not edit; `make proto` rewrites them)."""
