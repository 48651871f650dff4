"""The dashboard: `sialoop web` and `sialoop report --html`."""
