"""map_async(...).get() (tutorial, part 3), with coremap.Pool."""
import coremap as cm


def square(x):
    return x * x


if __name__ == "__main__":
    with cm.Pool() as pool:
        inputs = [0, 1, 2, 3, 4]
        outputs_async = pool.map_async(square, inputs)
        outputs = outputs_async.get(timeout=60)
    print(f"Output: {outputs}")
