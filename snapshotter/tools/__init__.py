"""Operators' tools: status, inspect, convert."""
