"""Where every weight file comes from and where it lives on disk."""
