"""clconv's version: its own module, so that every layer can read it without importing the
package's __init__ (which imports everything)."""
__version__ = "0.1.0"
