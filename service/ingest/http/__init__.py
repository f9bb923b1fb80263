"""The HTTP side: the listener thread, its routes and everything a request passes before the intake."""
