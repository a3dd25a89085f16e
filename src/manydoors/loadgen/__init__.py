"""Load generator: open, hold and exercise many connections."""
