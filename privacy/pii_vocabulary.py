"""The words and patterns that mark personal data: one copy for detection, masking and configs.

`privacy.detection` uses them to recognise PII, `privacy.masking` to mask it, and the starter
config (`fedcrm.data.starter_config`) to propose roles from column names. Checks that a
well-kept library does better live in that library, not here: phone numbers (``phonenumbers``),
the PRC resident id checksum and birth date (``stdnum.cn.ric``) and the Luhn check
(``stdnum.luhn``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType

from fedcrm.privacy.policies import PiiKind

__all__ = [
    "CN_COUNTRY_PREFIX",
    "CN_DATE_RE",
    "CN_MOBILE_RE",
    "COLUMN_CJK_HINTS",
    "COLUMN_TOKEN_HINTS",
    "COMMON_SURNAMES",
    "COMPOUND_SURNAMES",
    "EMAIL_RE",
    "HAN",
    "ID_COLUMN_NAME_RE",
    "NAME_PARTICLES",
    "PRC_ID_RE",
    "PRC_PROVINCE_CODES",
    "STREET_SUFFIXES",
]

# --------------------------------------------------------------------------------------------
# Characters and names
# --------------------------------------------------------------------------------------------

HAN = "\u3400-\u4dbf\u4e00-\u9fff\U00020000-\U0003134f"
"""Han ideographs, for use inside a regex character class (``f"[{HAN}]"``).

CJK Extension A (U+3400-U+4DBF), the Unified Ideographs block (U+4E00-U+9FFF) and Extensions
B-H (U+20000-U+3134F). Detection used the narrower ``\\u4e00-\\u9fff`` and masking
``\\u3400-\\u9fff``; the wider range is the correct one because rare characters outside the
unified block do occur in registered Chinese names and place names (which is why GB 18030-2022
requires support for extension characters), and a name written with one of them must be
detected and masked like any other. The Yijing hexagram symbols between Extension A and the
unified block (U+4DC0-U+4DFF) are not ideographs and are left out.
"""

COMMON_SURNAMES = frozenset(
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁"
    "任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦付傅方白邹孟熊秦邱江尹薛闫段雷侯龙史陶黎贺顾毛郝龚邵万钱严覃"
    "武戴莫孔向汤常温康施文牛樊葛邢安齐易乔伍庞颜倪庄聂章鲁岳翟殷詹申欧耿关兰焦俞左柳甘祝包宁尚符舒"
    "阮柯纪梅童凌毕单季裴霍涂成苗谷盛曲翁冉骆蓝路游辛靳管柴蒙鲍华喻祁蒲房滕屈饶解牟艾尤阳时穆农司卓"
    "古吉缪简车项连芦麦褚娄窦戚岑景党宫费卜冷晏席卫米柏宗瞿桂全佟应臧闵苟邬边卞姬师和仇栾隋商刁沙荣"
    "巫寇桑郎甄丛仲虞敖巩明佘池查麻苑迟邝"
)
"""Single-character Chinese surnames covering the large majority of the PRC population."""

COMPOUND_SURNAMES = frozenset(
    ("欧阳", "司马", "诸葛", "上官", "东方", "皇甫", "尉迟", "公孙", "慕容", "长孙", "宇文",
     "司徒", "夏侯", "令狐", "端木", "独孤", "南宫", "西门")
)
"""Two-character Chinese surnames: ``欧阳娜娜`` has surname ``欧阳``, not ``欧``."""

NAME_PARTICLES = frozenset({"van", "von", "de", "da", "del", "della", "di", "le", "la", "du",
                            "der", "den", "bin", "binti", "al", "ibn"})
"""Lower-case words inside Latin-script personal names ("Peter van Dyke")."""

STREET_SUFFIXES = (
    r"street|st|avenue|ave|road|rd|boulevard|blvd|lane|ln|drive|dr|court|ct|way|place|pl|"
    r"terrace|close|crescent|square|sq|highway|hwy|parkway|pkwy|row|gardens|strasse|straße"
)
"""Street-type words of Latin-script addresses, as a regex alternation."""

# --------------------------------------------------------------------------------------------
# Value shapes
# --------------------------------------------------------------------------------------------

EMAIL_RE = re.compile(r"[A-Za-z0-9._%+'-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
"""An e-mail address (use with ``fullmatch``)."""

CN_MOBILE_RE = re.compile(r"1[3-9]\d{9}")
"""The shape of a mainland-China mobile number without country code (``phonenumbers`` decides
whether the range is assigned)."""

CN_COUNTRY_PREFIX = r"^\s*(?:\+|00)86[\s-]*"
"""The +86 / 0086 country code in front of a Chinese number, with the separator after it.

A pattern string, not a compiled regex: masking also runs it in Arrow (RE2), whose syntax agrees
with Python's for this pattern."""

CN_DATE_RE = re.compile(r"\s*(\d{4})\s*年\s*(\d{1,2})\s*月\s*(\d{1,2})\s*日?\s*")
"""A Chinese-style date ``1990年3月7日`` (the final 日 optional); groups: year, month, day.
Use with ``fullmatch``."""

PRC_ID_RE = re.compile(r"[1-9]\d{16}[\dXx]")
"""The shape of an 18-character PRC resident identity number (GB 11643-1999)."""

PRC_PROVINCE_CODES = frozenset(
    {11, 12, 13, 14, 15, 21, 22, 23, 31, 32, 33, 34, 35, 36, 37, 41, 42, 43, 44, 45, 46,
     50, 51, 52, 53, 54, 61, 62, 63, 64, 65, 71, 81, 82, 83, 91}
)
"""First two digits of a PRC resident id: the province-level division (GB/T 2260)."""

# --------------------------------------------------------------------------------------------
# Column-name hints
# --------------------------------------------------------------------------------------------

COLUMN_TOKEN_HINTS: Mapping[PiiKind, frozenset[str]] = MappingProxyType({
    PiiKind.NAME: frozenset({"name", "fullname", "firstname", "lastname", "surname", "givenname",
                             "forename", "fname", "lname", "contactname", "customername"}),
    PiiKind.EMAIL: frozenset({"email", "mail", "emailaddress"}),
    PiiKind.PHONE: frozenset({"phone", "mobile", "tel", "telephone", "cell", "cellphone", "msisdn",
                              "phonenumber", "mobilephone", "fax"}),
    PiiKind.NATIONAL_ID: frozenset({"ssn", "nin", "idcard", "idnumber", "nationalid", "citizenid",
                                    "residentid", "identityid", "identitynumber", "idno",
                                    "passport", "sfz"}),
    PiiKind.BANK_CARD: frozenset({"pan", "cardnumber", "cardno", "creditcard", "bankcard",
                                  "ccnumber", "ccnum", "debitcard", "iban"}),
    PiiKind.IP_ADDRESS: frozenset({"ip", "ipaddress", "ipv4", "ipv6", "ipaddr", "remoteaddr",
                                   "clientip"}),
    PiiKind.ADDRESS: frozenset({"address", "addr", "street", "streetaddress", "addressline",
                                "address1", "address2", "residence", "homeaddress"}),
    PiiKind.BIRTH_DATE: frozenset({"dob", "birthday", "birthdate", "dateofbirth", "birth",
                                   "born"}),
    PiiKind.POSTCODE: frozenset({"zip", "zipcode", "postcode", "postalcode", "postal", "plz"}),
    PiiKind.CUSTOMER_ID: frozenset({"customerid", "custid", "clientid", "memberid", "userid",
                                    "accountid", "customerno", "customernumber", "memberno",
                                    "accountnumber", "accountno"}),
})
"""Lower-case words of a column name (and neighbours joined: "Card No" -> ``cardno``) that hint
at a PII kind. Matched against whole tokens, so ``zip`` does not fire on ``zipper_count``."""

COLUMN_CJK_HINTS: Mapping[PiiKind, tuple[str, ...]] = MappingProxyType({
    PiiKind.NAME: ("姓名", "名字", "联系人", "客户名称", "客户姓名"),
    PiiKind.EMAIL: ("邮箱", "电子邮件", "电邮"),
    PiiKind.PHONE: ("手机", "电话", "联系方式", "手机号", "座机"),
    PiiKind.NATIONAL_ID: ("身份证", "证件号", "身份号"),
    PiiKind.BANK_CARD: ("银行卡", "卡号", "信用卡", "银行账号"),
    PiiKind.IP_ADDRESS: ("IP地址", "ip地址"),
    PiiKind.ADDRESS: ("地址", "住址", "居住地"),
    PiiKind.BIRTH_DATE: ("出生", "生日"),
    PiiKind.POSTCODE: ("邮编", "邮政编码"),
    PiiKind.CUSTOMER_ID: ("客户编号", "客户ID", "客户id", "会员号", "会员编号", "用户ID", "用户id",
                          "客户号"),
})
"""Chinese column-name hints per PII kind, matched as substrings of the column name."""

ID_COLUMN_NAME_RE = re.compile(
    r"^(customer_?id|cust_?id|client_?id|member_?id|user_?id|id|客户(编号|id|ID)?)$", re.I
)
"""Whole column names that the starter config takes for the customer id (``role = "id"``) even
when the scan found no customer-id hint: this adds the bare ``id`` and ``客户``."""
