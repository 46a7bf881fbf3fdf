"""nodepass-gevent: NodePass v1.0, the TCP/UDP reverse tunnel, on gevent."""

__version__ = "0.2.0"
