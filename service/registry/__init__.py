"""Adapters: the versioned store on disk, the device cache with its budget, and the admin routes."""
