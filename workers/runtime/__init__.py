"""The runtime under the actors: the effect interpreter over shared memory and sockets, the
locks and frame allocator, actor start-up.
"""
