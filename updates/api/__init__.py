"""The versioned JSON API (`/api/v1/`) and the API tokens that reach it.

Views here are views like the pages': they fetch through the same scoped selectors, check
the same permissions and call the same services; nothing of the domain is decided here."""
