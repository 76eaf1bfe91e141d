"""The scenario catalogue: shipped real tables, images and generators that become clients.

Library code: any role may read it; it imports no role.
"""
