from headlab.cli import app

app()
