"""fenghuo: an instant-messaging relay."""
