"""`python -m pneumonia.serve --ckpt FILE`: a web page and a JSON API around one trained model
(`app.create_app`); uploads are checked and decoded in memory (`uploads`)."""
