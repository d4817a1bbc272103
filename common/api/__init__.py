"""The HTTP layer both services share: app factory, middlewares, request/response models and the routes."""
