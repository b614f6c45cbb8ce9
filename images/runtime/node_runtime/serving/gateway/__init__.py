"""The HTTP gateway in front of the model servers (`node-runtime gateway`): app.create_app builds it."""
