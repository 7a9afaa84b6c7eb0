"""The qcow2 image format: a driver qemu-img accepts as its own, with persistent dirty bitmaps.

``layout`` (header, extensions, entries), ``refcount`` (allocation), ``l2cache``, ``bitmaps``
(the bitmaps extension), ``node`` (the block node), ``create`` and ``check``.
"""
