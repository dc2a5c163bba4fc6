"""Adapters between the core and frameworks, tools and the command line."""
