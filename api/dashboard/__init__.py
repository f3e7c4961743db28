"""The web dashboard: static pages at ``/`` that talk to the JSON API with the user's key."""
