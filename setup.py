"""All metadata is in setup.cfg; only the long description is made here.

The long description is README.md with its relative links undone: on a package
index page a link to docs/protocol.md or #legacy-hosts leads nowhere, and the
project has no public URL to make them absolute against. Such a link becomes
its text, followed by the path in the source distribution (which carries docs/)
when the text does not already name it.
"""

import os
import re

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
# [text](target) or ![alt](target), target without spaces; text without brackets.
MARKDOWN_LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")
ABSOLUTE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # https:, mailto:, ...


def without_relative_links(markdown):
    def replace(match):
        image, text, target = match.groups()
        if ABSOLUTE.match(target):
            return match.group(0)
        path = target.split("#", 1)[0]
        if image or not path or text.strip("`") == path:
            return text  # an image or an anchor on the same page: only its text
        return "%s (%s in the source distribution)" % (text, path)
    return MARKDOWN_LINK.sub(replace, markdown)


def long_description():
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as readme:
        return without_relative_links(readme.read())


setup(long_description=long_description())
