"""The doctor: which limit stops this machine before N connections, and how to raise it.

``limits`` reads, ``capacity`` computes, ``advice`` explains, fixes and applies (raises
sysctls), ``measure`` measures what a connection costs here, ``cli`` is the command.
"""
