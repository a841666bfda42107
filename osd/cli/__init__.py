"""The ``osd`` command (typer): ``main`` holds the app, ``cluster`` the Ray commands."""
