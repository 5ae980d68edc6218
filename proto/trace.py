# placeholder until the tracing module lands (helper is writing the real one)
class Tracer:
    @staticmethod
    def open(d, actor):
        return None
