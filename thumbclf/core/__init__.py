"""Leaves: the results-folder layout and safe names, file writes and the lock, machine facts,
the predictions table, decisions, backbone names. Imports nothing else of thumbclf."""
