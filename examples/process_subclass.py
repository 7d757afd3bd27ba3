"""A Process subclass that prints its id and writes into a SharedArray (tutorial, part 1).

With multiprocessing alone the parent cannot see what a child computed; a
SharedArray pickles by name, so the child writes straight into the parent's memory.
"""
import multiprocessing
import time

import coremap as cm


class Process(multiprocessing.Process):
    def __init__(self, id, results):
        super().__init__()
        self.id = id
        self.results = results  # a SharedArray: travels by name, zero copy

    def run(self):
        time.sleep(0.1)
        print(f"I'm the process with id: {self.id}")
        with self.results.lock:
            self.results[self.id] = self.id * 10


if __name__ == "__main__":
    with cm.SharedArray.zeros(2, dtype=int) as results:
        for i in range(2):
            p = Process(i, results)
            p.start()
            p.join()
        print(f"Written by the children: {results.tolist()}")
