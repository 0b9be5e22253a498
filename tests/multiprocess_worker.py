"""A stand-in for launch.train in launcher tests: process 1 fails at once, the others wait to be stopped."""
import sys
import time

if __name__ == "__main__":
    args = dict(a.lstrip("-").split("=", 1) for a in sys.argv[1:] if "=" in a)
    print(f"worker {args['process_id']} of {args['num_processes']} at {args['coordinator']}", flush=True)
    if args["process_id"] == "1" and "--fail" in sys.argv:
        sys.exit(3)
    time.sleep(600)
