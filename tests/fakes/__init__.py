"""Fakes of outside services: real HTTP servers on loopback, faithful to ../shared/specs, breakable on demand."""
