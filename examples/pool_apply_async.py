"""apply_async over range(10) (tutorial, part 4), with coremap.Pool; lambdas work too."""
import coremap as cm

if __name__ == "__main__":
    with cm.Pool() as pool:
        result_async = [pool.apply_async(lambda x: x * x, args=(i,)) for i in range(10)]
        results = [r.get(timeout=60) for r in result_async]
    print(f"Output: {results}")
