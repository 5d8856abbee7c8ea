"""Peers a user would pick instead of the coordinator, measured on the same machine."""
