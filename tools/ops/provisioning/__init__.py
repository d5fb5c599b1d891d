"""``make provision``: the plan of what a type needs (``plan``), and one provisioner per kind of
resource, each creating what is missing and reporting what it found unchanged (``changes``)."""
