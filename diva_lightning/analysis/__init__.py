"""Section 2 diagnostics (Figure 2) and the ``diva-cli analyze`` tool."""
