"""What both embedding services share: settings, device choice, the app factory, batching, images, errors."""
