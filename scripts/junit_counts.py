"""One line of counts from a pytest junit file: passed, failed, errors, skipped, seconds.

    python scripts/junit_counts.py build/junit.xml
"""
import sys
import xml.etree.ElementTree as ET


def counts(path: str) -> str:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    secs = sum(float(s.get("time", 0)) for s in suites)
    passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    return (f"passed={passed} failed={total['failures']} errors={total['errors']} "
            f"skipped={total['skipped']} ({secs:.0f} s in pytest)")


if __name__ == "__main__":
    print(counts(sys.argv[1]))
