"""Pod lifecycle: sandboxes, containers and images; every decision lives here."""
