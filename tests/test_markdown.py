from domain_sae.util.markdown import escape_markdown, markdown_cell, markdown_code


def test_html_and_markup_are_inert():
    s = "<script>alert(1)</script> *b* [x](y) a|b `c` \\"
    out = escape_markdown(s)
    assert "<" not in out and ">" not in out
    assert out == ("&lt;script&gt;alert(1)&lt;/script&gt; \\*b\\* \\[x\\](y) a\\|b \\`c\\` \\\\")


def test_cell_keeps_one_row():
    assert markdown_cell("a\r\n<b>|") == "a\\\\n&lt;b&gt;\\|"


def test_code_fence_outgrows_backticks():
    block = markdown_code("x ```` y", "python")
    assert block.startswith("`````python\n") and block.endswith("\n`````")
