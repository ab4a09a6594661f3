"""Reading the dashboard's pages in Chromium: the live pages re-render their parts on every
update, so text is read by one script, never through an element found a moment before."""

from __future__ import annotations

from typing import Any


def text(driver: Any, element_id: str) -> str:
    """The rendered text of the element with ``element_id`` ("" while it is absent)."""
    found = driver.execute_script(
        "const e = document.getElementById(arguments[0]); return e ? e.innerText : '';",
        element_id,
    )
    return str(found)


def click(driver: Any, element_id: str) -> None:
    """A person's click on the element, found again if it was re-rendered meanwhile."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def attempt(d: Any) -> bool:
        try:
            d.find_element(By.ID, element_id).click()
        except StaleElementReferenceException:
            return False
        return True

    WebDriverWait(driver, 10).until(attempt)
