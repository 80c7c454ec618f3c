"""Reliability and security suite: fencing under load, faults, hostile input, nothing lost, live jobs."""
