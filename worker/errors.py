"""The one error type for bad input: it names the file and the problem in one line."""


class InputError(Exception):
    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
