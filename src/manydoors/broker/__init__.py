"""Brokers: how a message published anywhere reaches the workers holding its recipients."""
