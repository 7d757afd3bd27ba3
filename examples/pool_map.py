"""Pool.map of square over a list (tutorial, part 2), with coremap.Pool."""
import coremap as cm


def square(x):
    return x * x


if __name__ == "__main__":
    with cm.Pool(processes=4) as pool:
        inputs = [0, 1, 2, 3, 4]
        outputs = pool.map(square, inputs)
    print(f"Input: {inputs}")
    print(f"Output: {outputs}")
