"""Memory bank, matching, cut-paste composition and the boundary-ring masks."""
