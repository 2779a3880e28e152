//! JSON parsing that rejects duplicate object keys at any depth. OWNER: identity helper.
