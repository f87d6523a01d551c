"""The HTTP gateway: the app factory (`app`), what a process shares (`state`), the one events
reader (`fanin`), errors as responses (`problems`) and the routes by resource (`routes/`)."""
