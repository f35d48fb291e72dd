"""The web console's building blocks: sessions, page queries, SVG charts, rendering; its routes are api/console.py."""
