"""The Pusher Channels protocol (version 7): apps, channels, signing, frames, sessions.

A ``protocol = "pusher"`` service speaks it to pusher-js, Laravel Echo and pysher; the
HTTP API serves Pusher's REST API to the Pusher server libraries. Underneath it is the
same node: the hub, the fan-out, the router and the Redis backplane (``names.py`` says
how an app's channels and users live among the node's).
"""
