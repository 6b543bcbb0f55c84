"""HTTP plumbing shared by every capability: middleware, admission, body parsing, ops routes."""
