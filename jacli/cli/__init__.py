"""The click command line: parse, call the library, render. Nothing imports this package."""
